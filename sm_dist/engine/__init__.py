"""The engine: one process per stage on torch.distributed.rpc (transport.py alone imports
it), the stage workers, the coordinator's pipeline, and launching under torchrun."""
