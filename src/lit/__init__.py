"""Lightning adapters: thin modules and callbacks around :mod:`src.decoding` and :mod:`src.models`."""
