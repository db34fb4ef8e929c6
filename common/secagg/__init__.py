"""Secure aggregation: the coordinator learns the sum of the sites' updates and nothing about any one of them.

Pure library, no networking: :mod:`.protocol` (the state machines and messages), :mod:`.encoding` (floats to the
ring Z_2^b and bit packing), :mod:`.graph` (neighbours, k and t), :mod:`.keys` (X25519, HKDF, AES-GCM, signatures),
:mod:`.prg` (AES-CTR masks), :mod:`.shamir` (secret sharing), :mod:`.local` (an in-process round).
"""
