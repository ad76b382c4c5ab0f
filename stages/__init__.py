"""One click entry point per pipeline stage (`python -m stages.NAME --help`)."""
