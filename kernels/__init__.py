"""GPU kernels, each beside its plain-torch reference. Imports no grpc, protobuf or ucxx."""
