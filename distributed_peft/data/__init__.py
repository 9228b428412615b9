"""From a task's records to training batches: sources and file formats (files), prompt templates (prompts),
tokenizing, completion-only labels and splits (task_data), batching and packing (batching).

Imports: errors, runtime, config.
"""
