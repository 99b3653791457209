"""DiffRec: personalized recommendation with generated content.

The package keeps the historical name ``minigpt4`` that users of CoLLM and CoRA expect.
"""

__version__ = "0.1.0"
