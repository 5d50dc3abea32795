"""The least a Python KEMI handler can do for an OPTIONS (benchmarks/floor/kamailio.cfg says why)."""

import KSR


class Floor:
    def child_init(self, rank: int) -> int:
        return 0

    def ksr_request_route(self, msg: object) -> int:
        if KSR.is_OPTIONS():
            KSR.sl.sl_send_reply(200, "OK")
        else:
            KSR.sl.sl_send_reply(403, "Forbidden")
        return 1


def mod_init() -> Floor:
    return Floor()
