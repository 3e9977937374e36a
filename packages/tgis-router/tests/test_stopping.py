"""Stop sequences on streamed text: held back while undecided, cut with or without the match."""

from tgis_router.stopping import StopSequenceFilter


def _feed(stops, include, deltas, active=True):
    f = StopSequenceFilter(stops, include)
    emitted = []
    for delta in deltas:
        step = f.add(delta, active)
        emitted.append(step.emit)
        if step.stop_sequence is not None:
            return emitted, step.stop_sequence, f
    return emitted, None, f


def test_stop_sequence_cuts_text_after_match_when_included():
    emitted, stop, _ = _feed(["END"], True, ["Hello ", "E", "N", "D and more"])
    assert "".join(emitted) == "Hello END"
    assert stop == "END"


def test_stop_sequence_cuts_text_before_match_when_excluded():
    emitted, stop, _ = _feed(["END"], False, ["Hello ", "EN", "D!"])
    assert "".join(emitted) == "Hello "
    assert stop == "END"


def test_possible_start_of_a_stop_sequence_is_held_back_until_decided():
    emitted, stop, f = _feed(["\n\nUser:"], True, ["Hi", "\n", "\nUs", "ually"])
    assert emitted == ["Hi", "", "", "\n\nUsually"]
    assert stop is None
    assert f.held == ""


def test_held_text_is_released_when_the_request_ends_otherwise():
    emitted, stop, f = _feed(["STOP"], True, ["go ST"])
    assert emitted == ["go "]
    assert stop is None
    assert f.flush() == "ST"


def test_earliest_completed_stop_sequence_wins():
    emitted, stop, _ = _feed(["bcdef", "cd"], True, ["abcdefg"])
    assert stop == "cd"
    assert "".join(emitted) == "abcd"


def test_matching_is_off_before_min_new_tokens():
    emitted, stop, _ = _feed(["x"], True, ["axb"], active=False)
    assert emitted == ["axb"]
    assert stop is None


def test_no_stop_sequences_passes_text_through():
    emitted, stop, _ = _feed([], True, ["a", "b"])
    assert emitted == ["a", "b"]
    assert stop is None
