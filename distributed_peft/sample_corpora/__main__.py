"""Regenerate the sample corpora: python -m distributed_peft.sample_corpora."""

from distributed_peft.sample_corpora import main

main()
