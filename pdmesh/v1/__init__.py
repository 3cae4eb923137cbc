"""Generated code of the pdmesh.v1 wire contract (protos/pdmesh/v1). Do not edit: run
`make protos`."""

GENERATED_WITH = "grpcio-tools 1.85.1"
