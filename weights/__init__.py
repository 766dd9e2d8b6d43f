"""Shipped model and tokenizer assets (installed as the package `npgpt_weights`; holds no code)."""
