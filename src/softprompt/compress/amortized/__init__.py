"""The amortized compressor: any new context into soft tokens in one forward of the frozen model
(see docs/compressor.md). ``Compressor`` here is the trained compressor; the per-context compression
job is :class:`softprompt.compress.Compressor`."""
from softprompt.compress.amortized.contexts import Context, read_contexts, read_shared, split_contexts, split_of
from softprompt.compress.amortized.model import FORMS, Encoding, MemoryEncoder
from softprompt.compress.amortized.store import AmortizedCompressor
from softprompt.compress.amortized.trainer import TrainConfig, Trainer

Compressor = AmortizedCompressor

__all__ = ["AmortizedCompressor", "Compressor", "Context", "Encoding", "FORMS", "MemoryEncoder", "TrainConfig", "Trainer",
           "read_contexts", "read_shared", "split_contexts", "split_of"]
