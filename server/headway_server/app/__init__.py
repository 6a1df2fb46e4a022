"""Use cases: the operations service, the watch hub and the sweeper.

The layer between the edges (servicer, gateway) and the store: it applies the
domain's rules to values read from and written to the store interface. Nothing
here knows about grpc or protobuf, nor about how a store holds its data.
"""
