"""The engine: the stage workers on torch.distributed.rpc (transport.py alone imports it), the
coordinator's pipeline, replicas and the failures it names; starting the processes is
sm_dist/launch/'s."""
