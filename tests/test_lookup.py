"""The cheap lookups of engine/lookup.py find exactly what a plain `pc.index_in` against the whole table
finds: the same rows, the first match of a repeated id, null for an unknown one."""

import pyarrow as pa
import pyarrow.compute as pc

from unime_ray.engine.lookup import index_in_many, rows_named

TABLE = pa.table({"id": ["a", "b", "c", "b", "d"], "value": [0, 1, 2, 3, 4]})  # "b" twice: rows 1 and 3


def test_rows_named_keeps_table_order_and_the_first_match():
    values = pa.chunked_array([["d", "b"], ["zz", "b", "a"]])
    named = rows_named(TABLE, "id", values)
    assert named.to_pydict() == {"id": ["a", "b", "b", "d"], "value": [0, 1, 3, 4]}
    # Looking the values up among the named rows gives each one's first row of the whole table.
    where = pc.index_in(values, value_set=named["id"])
    got = pc.take(named["value"], where).to_pylist()
    want = pc.take(TABLE["value"], pc.index_in(values, value_set=TABLE["id"])).to_pylist()
    assert got == want == [4, 1, None, 1, 0]


def test_index_in_many_equals_one_lookup_per_part():
    parts = [
        pa.chunked_array([["c", "zz"], ["a"]]),
        pa.chunked_array([], pa.string()),
        pa.chunked_array([["b"]]),
    ]
    got = index_in_many(parts, TABLE["id"])
    assert [g.to_pylist() for g in got] == [[2, None, 0], [], [1]]
    assert [g.to_pylist() for g in got] == [pc.index_in(p, value_set=TABLE["id"]).to_pylist() for p in parts]
    assert index_in_many([], TABLE["id"]) == []
