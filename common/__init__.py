"""Shared engine for the BERT-family fine-tuning scripts (train_cls.py, train_ner.py, train_mlm.py)."""
