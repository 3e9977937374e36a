"""Generates the protobuf and gRPC stubs at build time, so they are never committed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

PROTOS = ("generation.proto", "shard.proto")
PACKAGE = "tgis_proto"


class ProtoStubsBuildHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        import grpc_tools
        from grpc_tools import protoc

        src = Path(self.root) / "src"
        well_known = Path(grpc_tools.__file__).parent / "_proto"
        for proto in PROTOS:
            args = [
                "grpc_tools.protoc",
                f"-I{src}",
                f"-I{well_known}",
                f"--python_out={src}",
                f"--pyi_out={src}",
                f"--grpc_python_out={src}",
                f"{PACKAGE}/{proto}",
            ]
            if protoc.main(args) != 0:
                raise RuntimeError(f"protoc failed on {proto}")
        # Generated files are git-ignored; artifacts puts them into the wheel anyway.
        build_data["artifacts"].extend(
            f"src/{PACKAGE}/{Path(proto).stem}{suffix}"
            for proto in PROTOS
            for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
        )
