"""Descriptors from models: extraction (probes, one backward per batch), the
on-disk DescriptorStore and the resumable writer that fills it."""
