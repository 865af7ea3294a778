"""The memoised tower inputs (service/tower_inputs.py) equal the bundle encoder's, for every kind of user state."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from models.inputs import history_codes, user_features
from service.runtime import find_target, load_runtime
from service.userstate import RedisRecord, resolve
from tests.serving import Tree, settings


def _encoded(rt, states):  # the encoder's own path, no memo
    enc = rt.model.encoder
    return user_features(enc, rt.users.profile_table([s.profile for s in states])) | history_codes(
        enc, [s.history for s in states], rt.history_len
    )


def test_memoised_inputs_equal_the_encoders_and_follow_live_profiles(serving_tree: Tree) -> None:
    rt = load_runtime(find_target(settings(serving_tree)))
    users = list(rt.users.row)
    known = rt.index.ids[:3].tolist()
    field = next(c for c in rt.users.columns if c != "user_id")  # a profile field the user tower reads
    stored = [resolve(u, rt.users, None, False, None, None) for u in users]
    assert all(s.profile_row == rt.users.row[s.user_id] for s in stored)
    live = [
        resolve(users[0], rt.users, RedisRecord({field: "77"}, None), True, None, None),  # a Redis field changes it
        resolve(users[1], rt.users, None, False, [known[0], "not-in-catalog", known[1]], {field: 5}),  # a request's
        resolve("stranger", rt.users, None, False, [known[2], known[2]], None),  # nobody's row
    ]
    assert [s.profile_row for s in live] == [None, None, None]
    # twice each: the first pass fills the memo, the second reads it; mixed batches keep the job order
    for batch in (stored[:1], stored, live, [live[0], stored[0], live[2], stored[3]], stored):
        for _ in range(2):
            got, want = rt.tower_inputs(batch), _encoded(rt, batch)
            assert list(got) == list(want)
            for name, a in want.items():
                assert got[name].dtype == a.dtype and np.array_equal(got[name], a), name
    # the live profile really differs from the stored one where it was changed, so the memo was not read for it
    first = rt.tower_inputs([live[1], stored[1]])
    assert any(not np.array_equal(first[n][0], first[n][1]) for n in first)


def test_batches_on_several_threads_fill_one_memo_without_losing_rows(serving_tree: Tree) -> None:
    """The batcher runs batches on executor threads: batches filling the empty memo at once all read it right."""
    rt = load_runtime(find_target(settings(serving_tree)))
    stored = [resolve(u, rt.users, None, False, None, None) for u in rt.users.row]
    batches = [stored[i::4] for i in range(4)] * 4
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(rt.tower_inputs, batches))
    for batch, got in zip(batches, results, strict=True):
        want = _encoded(rt, batch)
        assert all(np.array_equal(got[n], a) for n, a in want.items())
    assert rt.inputs._profile_done.all()  # every stored row went in once, into the one memo that was kept
    got, want = rt.tower_inputs(stored), _encoded(rt, stored)
    assert all(np.array_equal(got[n], a) for n, a in want.items())
