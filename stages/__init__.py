"""One click entry point per pipeline stage (`python -m stages.NAME --help`)."""

from pipeline.agent import die_with_agent

die_with_agent()  # under torchrun: no rank outlives its agent (pipeline/agent.py); nothing otherwise
