"""mpitrain: MPI data-parallel training with fault injection in the gradient message path.

Data flows one way: config -> context -> data (shard) -> model (replica) -> sync ->
comm (allreduce, transport, faults) -> optim -> metrics / checkpoint.  See README.md.
"""
__version__ = "0.1.0"
