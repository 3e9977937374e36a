"""A small command-line client: ``python -m tgis_router.client "The capital of France is"``."""

from __future__ import annotations

import argparse
import sys

import grpc

from tgis_proto import generation_pb2 as fmaas
from tgis_proto import generation_pb2_grpc as fmaas_grpc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tgis_router.client", description=__doc__)
    parser.add_argument("text", help="the prompt")
    parser.add_argument("--address", default="localhost:8033")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    args = parser.parse_args(argv)
    with grpc.insecure_channel(args.address) as channel:
        stub = fmaas_grpc.GenerationServiceStub(channel)
        request = fmaas.SingleGenerationRequest(
            request=fmaas.GenerationRequest(text=args.text),
            params=fmaas.Parameters(stopping=fmaas.StoppingCriteria(max_new_tokens=args.max_new_tokens)),
        )
        try:
            for response in stub.GenerateStream(request):
                sys.stdout.write(response.text)
                sys.stdout.flush()
                if response.stop_reason:
                    reason = fmaas.StopReason.Name(response.stop_reason)
                    print(f"\n[{response.generated_token_count} tokens, {reason}]")
        except grpc.RpcError as e:
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
