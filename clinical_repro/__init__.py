"""Reproducible study: do clinical language models still beat general ones on MedNLI, RadQA and CLIP?

Modules:

- `clinical_repro.train`: Fine-tuning on the Hugging Face Trainer: dynamic padding, length grouping, the precision policy, memory-safe batch sizing with OOM recovery that keeps the effective batch, memory options for billion-parameter models, checkpoint/resume and cost accounting."""

__version__ = "0.1.0"
