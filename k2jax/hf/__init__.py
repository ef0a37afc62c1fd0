"""Hugging Face interop: the one name/layout table and in-memory conversions."""
