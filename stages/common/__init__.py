"""Code shared by the stages: params, command line, atomic outputs, geometry, scene reading."""
