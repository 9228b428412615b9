"""The model a recipe trains: base loading and quantization, LoRA attachment (loading), the embedded tiny bases
(embedded_base), packed attention for padding-free batches, sparse LoRA dropout.

Imports: errors, runtime, config, data.
"""
