"""DriftScope core: which concepts did an adaptation of a text-to-image model change?

Plain torch, no host imports. A reading order that follows the method (method.md):
text -> vocabulary -> prompts -> conditioning -> text_encoder -> soft_prompt -> attention -> sampling -> objective
-> meter -> search -> calibration -> report -> audit; grid renders the evidence.
"""
__version__ = "0.1.0"
