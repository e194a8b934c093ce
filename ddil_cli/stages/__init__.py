"""One function per pipeline stage: a config dataclass in, an output folder out."""
