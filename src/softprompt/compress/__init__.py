"""Context compression: distill a long context into a few soft tokens (see docs/compression.md)."""
from softprompt.compress.compressor import CompressConfig, Compressor, CompressResult, compress
from softprompt.compress.queries import generate_queries, split_queries
from softprompt.data.queries import Query, read_queries

__all__ = ["CompressConfig", "CompressResult", "Compressor", "compress", "Query", "read_queries",
           "generate_queries", "split_queries"]

# prefix tuning -> an input-level prompt by distillation (softprompt convert)
from softprompt.compress.convert import ConvertConfig, convert_prompt  # noqa: E402

__all__ += ["ConvertConfig", "convert_prompt"]
