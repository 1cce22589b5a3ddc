"""autoresearch: an unattended loop that edits train.py, trains for a fixed budget and keeps what helps."""

__version__ = "0.1.0"
