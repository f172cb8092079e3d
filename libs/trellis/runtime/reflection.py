"""The descriptor pool server reflection answers from, with method symbols found.

grpcio-reflection answers ``file_containing_symbol`` with the protobuf descriptor pool's
``FindFileContainingSymbol``, and the pool of protobuf's default (upb) backend does not
know method names: ``pkg.Service.Method`` is a KeyError, so ``grpcurl describe
pkg.Service.Method`` (and grpcui, Postman, ...) fail with "Symbol not found" on every
service while services and messages work (grpc/grpc#34743, open upstream). Here a
method's symbol falls back to its service's file, which declares the method; everything
else goes to the default pool unchanged.
"""

from __future__ import annotations

from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor, FileDescriptor


class MethodSymbolPool:
    """The calls grpcio-reflection makes on a pool, answered by ``pool`` (the default one),
    plus method symbols in ``FindFileContainingSymbol``."""

    def __init__(self, pool: descriptor_pool.DescriptorPool | None = None) -> None:
        self._pool = pool or descriptor_pool.Default()

    def FindFileContainingSymbol(self, symbol: str) -> FileDescriptor:
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service, _, method = symbol.rpartition(".")
            try:
                found = self._pool.FindServiceByName(service)
            except KeyError:
                found = None
            if found is None or method not in found.methods_by_name:
                raise
            return found.file

    def FindFileByName(self, name: str) -> FileDescriptor:
        return self._pool.FindFileByName(name)

    def FindMessageTypeByName(self, name: str) -> Descriptor:
        return self._pool.FindMessageTypeByName(name)

    def FindExtensionByNumber(self, message: Descriptor, number: int) -> FieldDescriptor:
        return self._pool.FindExtensionByNumber(message, number)

    def FindAllExtensions(self, message: Descriptor) -> list[FieldDescriptor]:
        return self._pool.FindAllExtensions(message)
