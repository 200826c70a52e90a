"""The project's SGLang payloads against sglang 0.5.23's request classes (a fixture written from the
wheel's source by ``tools/check_sglang_protocol.py``): SGLang ignores unknown top-level fields, so a
misspelt one would pass every other test and silently take its default in production. The stand-in
server must be exactly as strict: the same required fields, the same sampling parameters."""

import json
from pathlib import Path

from srpo_megatron.testing import fake_sglang_server
from srpo_megatron.testing.sglang_protocol import check_payloads, project_payloads

SPEC = json.loads((Path(__file__).parent / "fixtures/sglang_0.5.23_routes.json").read_text())


def test_every_payload_matches_sglang_0_5_23_route_by_route():
    assert SPEC["version"] == "0.5.23"
    payloads = project_payloads()
    assert {"generate", "init_weights_update_group", "update_weights_from_tensor"} <= payloads.keys()
    assert [r for r in check_payloads(payloads, SPEC) if not r[1]] == []


def test_the_check_catches_a_misspelt_field_a_missing_one_and_an_unknown_sampling_parameter():
    payloads = project_payloads()
    payloads["init_weights_update_group"][0]["group_nme"] = payloads["init_weights_update_group"][0].pop(
        "group_name"
    )
    del payloads["update_weights_from_distributed"][0]["shapes"]
    payloads["generate"][0]["sampling_params"][0]["seed"] = 1
    problems = {route: what for route, ok, what in check_payloads(payloads, SPEC) if not ok}
    assert problems.keys() == {"init_weights_update_group", "update_weights_from_distributed", "generate"}
    assert "['group_nme'] are not in InitWeightsUpdateGroupReqInput" in problems["init_weights_update_group"]
    assert "required fields ['shapes'] are not sent" in problems["update_weights_from_distributed"]
    assert "sampling parameters ['seed']" in problems["generate"]


def test_the_stand_in_is_as_strict_as_sglang_0_5_23():
    for route, required in fake_sglang_server.REQUIRED.items():
        assert sorted(required) == SPEC["routes"][route]["required"], route
    assert sorted(fake_sglang_server.SAMPLING_FIELDS) == SPEC["sampling_params"]["fields"]
