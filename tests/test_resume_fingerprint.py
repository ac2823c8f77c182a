"""Which resumes the checkpoint's fingerprint accepts: a key the checkpoint predates, taken as its
default, and a knob that changes no weight go on, saying so; a width or a machine's part that
differs, or a new key set away from its default, is refused in one line naming it."""

from enigma.train.config import build_config
from enigma.train.resume import DATA_ORDER_KEYS, compare, fingerprint


def stamp(*sets, **fields):
    cfg = build_config("tiny", sets=list(sets), **fields)
    return fingerprint(cfg.model_config(), {"splits": 1}, 2, dict.fromkeys(DATA_ORDER_KEYS, 0))


def test_a_checkpoint_from_before_a_new_key_resumes_and_a_changed_width_is_refused():
    old = stamp()
    for new in ("attention_kernel", "coupling_hidden", "rotor_matmul"):  # keys added since
        del old["model"][new]
    refused, accepted = compare(old, stamp())
    assert refused is None
    assert any("coupling_hidden (new since the checkpoint) 0, its default" in a for a in accepted)
    refused, _ = compare(old, stamp("coupling_hidden=64"))
    assert "coupling_hidden is new since the checkpoint, which ran as its default 0" in refused
    refused, _ = compare(stamp(), stamp("d=64", "num_heads=2"))
    assert refused.startswith("its model differs (d 128 -> 64")
    refused, _ = compare(stamp(), stamp("machine_seed=3"))
    assert "machine_seed 0 -> 3" in refused, "another plugboard: the weights mean something else"


def test_a_knob_that_changes_no_weight_is_accepted_and_said():
    refused, accepted = compare(stamp(), stamp("attention_kernel=sdpa", "rotor_matmul=bf16"))
    assert refused is None
    assert "attention_kernel 'auto' -> 'sdpa'" in accepted and len(accepted) == 2
    saved_before_bos_moved = stamp()
    saved_before_bos_moved["model"]["bos_token_id"] = 101
    assert compare(saved_before_bos_moved, stamp())[0] is None
