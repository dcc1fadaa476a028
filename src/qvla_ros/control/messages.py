"""ROS message plumbing without rclpy: message classes imported by interface name, nested field dictionaries copied
into message objects, and time fields.

    import_message_type("sensor_msgs/msg/JointState")          the message class (MessageError when not importable)
    fill(msg, {"header": {"stamp": stamp_fields(t)}, ...})     msg, with the fields set

Message classes are imported by name only when a node asks for one, so importing this module imports no rclpy.
"""

from __future__ import annotations

import importlib
import re

import numpy as np


class MessageError(ValueError):
    """A message type is not importable, or a message lacks or misshapes a field; the message says which."""


def import_message_type(name: str):
    """'sensor_msgs/msg/JointState' (or 'sensor_msgs/JointState') -> the message class."""
    parts = name.split("/")
    if len(parts) == 2:
        parts = [parts[0], "msg", parts[1]]
    if len(parts) != 3:
        raise MessageError(f"not a ROS interface name: {name!r}")
    pkg, kind, typ = parts
    try:
        return getattr(importlib.import_module(f"{pkg}.{kind}"), typ)
    except (ImportError, AttributeError) as e:
        raise MessageError(f"message type {name} is not importable ({e}); install or source the package {pkg}") from e


def stamp_fields(t: float) -> dict:
    sec = int(np.floor(t))
    return {"sec": sec, "nanosec": int(round((t - sec) * 1e9)) % 1_000_000_000}


def duration_fields(seconds: float) -> dict:
    return stamp_fields(seconds)


_SEQ = re.compile(r"sequence<([\w]+)/([\w]+)(?:,\s*\d+)?>")


def fill(msg, fields: dict):
    """Copy a nested field dictionary into a ROS message object (what rosidl_runtime_py.set_message_fields does;
    that package has no wheel). Lists of dicts become lists of the field's element message type."""
    types = msg.get_fields_and_field_types() if hasattr(msg, "get_fields_and_field_types") else {}
    for key, value in fields.items():
        if isinstance(value, dict):
            fill(getattr(msg, key), value)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            m = _SEQ.fullmatch(types.get(key, ""))
            if not m:
                raise MessageError(f"{type(msg).__name__}.{key} is not a sequence of messages")
            cls = import_message_type(f"{m.group(1)}/msg/{m.group(2)}")
            items = []
            for v in value:
                item = cls()
                fill(item, v)
                items.append(item)
            setattr(msg, key, items)
        else:
            setattr(msg, key, value)
    return msg
