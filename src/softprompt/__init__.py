"""softprompt: learn, evaluate, inspect, compress and serve soft prompts for frozen LLMs."""
__version__ = "0.1.0"
