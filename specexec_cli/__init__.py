"""specexec: SpecExec speculative decoding for large language models on consumer hardware."""

__version__ = "0.1.0"
