"""Differential privacy for Cohort: accounting, clipping, rotation, Skellam and Gaussian noise (pure, no I/O).

Modules:

- :mod:`.accounting` -- privacy events and the PLD/RDP accountant (``dp-accounting``), noise planning;
- :mod:`.rdp` -- RDP curves the library lacks (Skellam, generic Poisson subsampling);
- :mod:`.skellam` -- distributed discrete noise under secure aggregation;
- :mod:`.rotation` -- randomized Hadamard rotation with public per-round randomness;
- :mod:`.clipping` -- L2 clipping and adaptive clipping;
- :mod:`.central` -- central Gaussian noise (the mode without secure aggregation);
- :mod:`.randomness` -- CSPRNG-seeded numpy generators.
"""
