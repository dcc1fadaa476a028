"""DDS settings that keep qvla's traffic fast and on this machine (no rclpy import: used before rclpy starts).

Camera images are large: with Fast DDS defaults they are fragmented over UDP and arrive late or not at all. The
shared-memory participant profile in config/fastdds_shm.xml fixes that and also keeps every message on this
host. The bring-up runner, the demo and the tests start their ROS processes with `local_dds_environment()`.
"""

from __future__ import annotations

import os
from pathlib import Path

SHM_PROFILE_NAME = "fastdds_shm.xml"


def config_dir() -> Path:
    """The qvla_ros config folder: the source tree's when running from a checkout, else the installed share."""
    source = Path(__file__).resolve().parents[2] / "config"
    if (source / SHM_PROFILE_NAME).is_file():
        return source
    try:
        from ament_index_python.packages import get_package_share_directory

        return Path(get_package_share_directory("qvla_ros")) / "config"
    except Exception:  # ament_index not importable, or the package not in AMENT_PREFIX_PATH
        import sys

        return Path(sys.prefix) / "share" / "qvla_ros" / "config"


def local_dds_environment(domain_id: int | None = None, base: dict | None = None) -> dict[str, str]:
    """Environment for ROS processes that talk over shared memory on this machine only.

    domain_id: ROS_DOMAIN_ID to use (tests pass their own so that parallel runs never see each other);
    None keeps the caller's (or 0).
    """
    env = dict(os.environ if base is None else base)
    profile = config_dir() / SHM_PROFILE_NAME
    if not profile.is_file():
        raise FileNotFoundError(
            f"Fast DDS profile {profile} is missing; reinstall qvla_ros (make setup) or set "
            "FASTDDS_DEFAULT_PROFILES_FILE yourself"
        )
    env["RMW_IMPLEMENTATION"] = env.get("RMW_IMPLEMENTATION") or "rmw_fastrtps_cpp"
    env["FASTDDS_DEFAULT_PROFILES_FILE"] = str(profile)
    # LOCALHOST would make rmw_fastrtps replace the profile's transports with its own (UDP on loopback)
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "SYSTEM_DEFAULT"
    env.pop("ROS_LOCALHOST_ONLY", None)
    if domain_id is not None:
        if not 0 <= int(domain_id) <= 232:
            raise ValueError(f"ROS_DOMAIN_ID must be in [0, 232], got {domain_id}")
        env["ROS_DOMAIN_ID"] = str(int(domain_id))
    return env
