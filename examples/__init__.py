"""Example models and workloads for kiln (see ``examples.models``)."""
