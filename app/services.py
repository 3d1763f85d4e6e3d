"""DashScope's video services under /services/aigc/<group>/<function>, and how each is called."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Service:
    """One service path: an async task (submitted, recorded, owned) or a synchronous check."""

    group: str
    function: str
    asynchronous: bool
    # Which models DashScope serves on it, for the documentation (docs/sdk.md, OpenAPI).
    serves: str

    @property
    def path(self) -> str:
        """Return the path under /api/v1/, as DashScope names it."""
        return f"services/aigc/{self.group}/{self.function}"


SERVICES = (
    Service(
        "video-generation",
        "video-synthesis",
        True,
        "text-to-video, image-to-video, VACE editing, effect templates (wan, wanx); "
        "SDK 2.x sends every video model here, kf2v included",
    ),
    Service(
        "image2video",
        "video-synthesis",
        True,
        "first/last frame (SDK 1.x: every model whose name contains `kf2v`), wan2.2-s2v, "
        "wan2.2-animate-move/mix, EMO, LivePortrait, VideoRetalk, Emoji, AnimateAnyone",
    ),
    Service(
        "image2video",
        "aa-template-generation",
        True,
        "AnimateAnyone's motion template from a video (animate-anyone-template-gen2)",
    ),
    Service(
        "image2video",
        "face-detect",
        False,
        "the image check before EMO, LivePortrait, wan2.2-s2v and Emoji "
        "(emo-detect-v1, liveportrait-detect, wan2.2-s2v-detect, emoji-detect-v1)",
    ),
    Service(
        "image2video",
        "aa-detect",
        False,
        "the image check before AnimateAnyone (animate-anyone-detect-gen2)",
    ),
)

BY_PATH = {(service.group, service.function): service for service in SERVICES}
GROUPS = frozenset(service.group for service in SERVICES)
