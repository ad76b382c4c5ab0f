"""One click entry point per pipeline stage (`python -m stages.NAME --help`)."""

from pipeline.launch import die_with_agent

die_with_agent()  # under torchrun: no rank outlives its agent (pipeline.launch.die_with_agent); nothing otherwise
