"""Planning: analytic memory plans (`memory`) and AOT compiles for TPU topologies (`tpu`)."""
