"""The generated stubs carry TGIS's wire contract (package, names, field numbers)."""

from tgis_proto import generation_pb2 as fmaas
from tgis_proto import generation_pb2_grpc, shard_pb2_grpc


def _numbers(message) -> dict[str, int]:
    return {f.name: f.number for f in message.DESCRIPTOR.fields}


def test_generation_service_is_fmaas_with_the_four_rpcs():
    service = fmaas.DESCRIPTOR.services_by_name["GenerationService"]
    assert service.full_name == "fmaas.GenerationService"
    assert {m.name for m in service.methods} == {"Generate", "GenerateStream", "Tokenize", "ModelInfo"}
    assert hasattr(generation_pb2_grpc, "GenerationServiceStub")
    assert hasattr(shard_pb2_grpc, "ShardServiceStub")


def test_field_numbers_match_tgis():
    assert _numbers(fmaas.BatchedGenerationRequest) == {"model_id": 1, "prefix_id": 2, "requests": 3, "params": 10}
    assert _numbers(fmaas.GenerationResponse) == {
        "input_token_count": 6,
        "generated_token_count": 2,
        "text": 4,
        "stop_reason": 7,
        "stop_sequence": 11,
        "seed": 10,
        "tokens": 8,
        "input_tokens": 9,
    }
    assert _numbers(fmaas.Parameters) == {
        "method": 1,
        "sampling": 2,
        "stopping": 3,
        "response": 4,
        "decoding": 5,
        "truncate_input_tokens": 6,
    }
    assert _numbers(fmaas.StoppingCriteria) == {
        "max_new_tokens": 1,
        "min_new_tokens": 2,
        "time_limit_millis": 3,
        "stop_sequences": 4,
        "include_stop_sequence": 5,
    }
    assert _numbers(fmaas.SamplingParameters) == {"temperature": 1, "top_k": 2, "top_p": 3, "typical_p": 4, "seed": 5}
    assert _numbers(fmaas.ResponseOptions) == {
        "input_text": 1,
        "generated_tokens": 2,
        "input_tokens": 3,
        "token_logprobs": 4,
        "token_ranks": 5,
        "top_n_tokens": 6,
    }
    assert _numbers(fmaas.TokenInfo) == {"text": 2, "logprob": 3, "rank": 4, "top_tokens": 5}
    assert _numbers(fmaas.BatchedTokenizeRequest) == {
        "model_id": 1,
        "requests": 2,
        "return_tokens": 3,
        "return_offsets": 4,
        "truncate_input_tokens": 5,
    }
    assert _numbers(fmaas.ModelInfoResponse) == {"model_kind": 1, "max_sequence_length": 2, "max_new_tokens": 3}
    assert fmaas.StopReason.Value("TOKEN_LIMIT") == 6
    assert fmaas.StopReason.Value("ERROR") == 7
