"""Meshes, the logical-axis rules table, shardings of everything placed on a mesh, multi-host."""

from jais2_jax.parallel.sharding import (
                                         LOGICAL_AXIS_RULES,
                                         MESH_AXES,
                                         abstract_mesh,
                                         abstract_params,
                                         batch_sharding,
                                         cache_shardings,
                                         init_params_sharded,
                                         make_mesh,
                                         model_param_shardings,
                                         named_sharding,
                                         opt_state_shardings,
                                         param_shardings,
                                         parse_mesh,
                                         shard_params,
                                         use_mesh,
)

__all__ = ["LOGICAL_AXIS_RULES", "MESH_AXES", "abstract_mesh", "abstract_params", "batch_sharding",
           "cache_shardings", "init_params_sharded", "make_mesh", "model_param_shardings", "named_sharding",
           "opt_state_shardings", "param_shardings", "parse_mesh", "shard_params", "use_mesh"]
