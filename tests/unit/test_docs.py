"""docs/protocol.md is generated from the codec tables; it must match them."""

from pathlib import Path

from rawpunch.proto import codec
from rawpunch.proto.doc import render

DOC = Path(__file__).parents[2] / "docs" / "protocol.md"


def test_protocol_doc_is_current() -> None:
    assert DOC.read_text() == render(), "docs/protocol.md is stale: run scripts/gen-docs"


def test_protocol_doc_names_every_message_and_attribute() -> None:
    text = render()
    for name in [*codec.MessageType.__members__, *codec.Attr.__members__, *codec.ErrorCode.__members__]:
        assert f"| {name} |" in text
