"""pyfk on torch.distributed: sharded top-k, selection and acquisition (DESIGN.md section 9)."""
