"""Identifier types shared across the engine. NewTypes keep a block id from passing as a token."""

from __future__ import annotations

from typing import NewType

RequestId = NewType("RequestId", str)
BlockId = NewType("BlockId", int)
BlockHash = NewType("BlockHash", int)
TokenId = int
