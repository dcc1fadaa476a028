"""DDS settings that keep qvla's traffic fast and on this machine (no rclpy import: used before rclpy starts).

Camera images are large: with Fast DDS defaults they are fragmented over UDP and arrive late or not at all. The
shared-memory participant profile in config/fastdds_shm.xml fixes that and also keeps every message on this
host. The bring-up runner, the demo and the tests start their ROS processes with `local_dds_environment()`.
"""

from __future__ import annotations

import os

from qvla_ros.paths import config_path

SHM_PROFILE_NAME = "fastdds_shm.xml"


def local_dds_environment(domain_id: int | None = None, base: dict | None = None) -> dict[str, str]:
    """Environment for ROS processes that talk over shared memory on this machine only.

    domain_id: ROS_DOMAIN_ID to use (tests pass their own so that parallel runs never see each other);
    None keeps the caller's (or 0).
    """
    env = dict(os.environ if base is None else base)
    profile = config_path(SHM_PROFILE_NAME)  # a clear error listing where it looked when missing
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
