"""The floor of the KEMI path, for `make bench`: benchmarks/native/kamailio.cfg's routing, line for line,
as a Python KEMI script (benchmarks/floor/kamailio.cfg loads it; KEMI_O365_FLOOR_SCRIPT names it).

Same modules, parameters, listeners and processes as the native yardstick; only the language of the
routing differs. What it costs over native is what app_python3 itself costs for that logic: entering
Python for every request and reply, and a KSR call for every module function. Not a product: no
topology hiding, no policy, no metrics, no records. For an OPTIONS it does even less than native (one
KSR test and the reply), so its OPTIONS figure is the least any Python KEMI script pays.
"""

import re
from typing import ClassVar

import KSR

# The native route's Request-URI host test.
_HOST = re.compile(r"^pstn[0-9]?-o365\.example\.com$")


class _Defines:
    """The native cfg's #!define values, read once per process through $def."""

    values: ClassVar[dict[str, str]] = {}

    @classmethod
    def get(cls, name: str) -> str:
        value = cls.values.get(name)
        if value is None:
            raw = KSR.pv.gete(f"$def({name})")
            value = cls.values[name] = raw.strip('"').replace("\\r\\n", "\r\n")
        return value


D = _Defines.get


class Floor:
    def child_init(self, rank: int) -> int:
        return 0

    def ksr_request_route(self, msg: object) -> int:
        if KSR.is_OPTIONS():
            KSR.sl.sl_send_reply(200, "OK")
            return 1
        listener = KSR.pv.gete("$Rn")
        if self._refused(listener):
            return 1
        if KSR.is_CANCEL():
            if KSR.tm.t_check_trans() > 0:
                KSR.rtpengine.rtpengine_delete0()
                KSR.tm.t_relay()
            return 1
        if KSR.siputils.has_totag() > 0:
            self._in_dialog(listener)
            return 1
        if KSR.is_ACK():
            if KSR.tm.t_check_trans() > 0:
                KSR.tm.t_relay()
            return 1
        if KSR.tmx.t_precheck_trans() > 0:
            KSR.tm.t_check_trans()
            return 1
        KSR.tm.t_check_trans()
        if not KSR.is_INVITE() or listener == "microsoft":
            KSR.sl.sl_send_reply(404, "Not Found")
            return 1
        self._to_microsoft()
        return 1

    def _refused(self, listener: str) -> bool:
        """The native route's first checks; True when the request was answered or dropped."""
        if listener in ("cucm_tcp", "cucm_udp"):
            if KSR.pv.gete("$si") != D("CUCM_SOURCE"):
                KSR.sl.sl_send_reply(403, "Forbidden")
                return True
        elif not (KSR.is_ACK() or KSR.is_BYE() or KSR.is_CANCEL()):
            KSR.sl.sl_send_reply(403, "Forbidden")
            return True
        if KSR.sanity.sanity_check(18407, 7) < 0:
            return True
        if KSR.maxfwd.process_maxfwd(70) < 0:
            KSR.sl.sl_send_reply(483, "Too Many Hops")
            return True
        return False

    def _to_microsoft(self) -> None:
        if not _HOST.match(KSR.pv.gete("$rd")):
            KSR.sl.sl_send_reply(404, "Not Found")
            return
        if KSR.textops.has_body_type("application/sdp") < 0:
            KSR.sl.sl_send_reply(488, "Not Acceptable Here (delayed offer)")
            return
        KSR.pv.sets("$var(native_sdp)", KSR.pv.gete("$rb"))
        if KSR.rtpengine.rtpengine_offer(D("OFFER_TO_MICROSOFT")) < 0:
            KSR.sl.sl_send_reply(503, "Media Relay Unavailable")
            return
        KSR.uac.uac_replace_to_uri(D("UM_TO_URI"))
        transport = "udp" if KSR.pv.gete("$pr") == "udp" else "tcp"
        KSR.rr.record_route_preset(
            f"{D('CUCM_ADDR')}:{D('CUCM_PORT')};transport={transport};r2=on",
            f"{D('SBC_FQDN')}:{D('MS_PORT')};transport=tls;r2=on",
        )
        if KSR.dispatcher.ds_select_dst(1, 8) < 0:
            KSR.sl.sl_send_reply(503, "No Microsoft Proxy Available")
            KSR.rtpengine.rtpengine_delete0()
            return
        proxy = KSR.pv.gete("$dd")
        KSR.seturi(f"sip:{KSR.pv.gete('$rU')}@{proxy}:{KSR.pv.gete('$dp')};transport=tls")
        KSR.corex.set_send_socket(f"tls:{D('MS_ADDR')}:{D('MS_PORT')}")
        KSR.set_advertised_address(D("SBC_FQDN"))
        KSR.set_advertised_port(D("MS_PORT"))
        KSR.pv.sets("$xavp(tls=>server_name)", proxy)
        KSR.pv.sets("$xavp(tls[0]=>server_id)", proxy)
        KSR.tm.t_on_reply("ksr_from_microsoft")
        KSR.tm.t_on_failure("ksr_microsoft_failed")
        if KSR.tm.t_relay() < 0:
            KSR.sl.sl_reply_error()
            KSR.rtpengine.rtpengine_delete0()

    def _in_dialog(self, listener: str) -> None:
        if KSR.rr.loose_route() < 0:
            if not KSR.is_ACK():
                KSR.sl.sl_send_reply(404, "Not Here")
            return
        if KSR.is_BYE():
            KSR.rtpengine.rtpengine_delete0()
        if listener != "microsoft":
            host = KSR.pv.gete("$rd")
            KSR.pv.sets("$xavp(tls=>server_name)", host)
            KSR.pv.sets("$xavp(tls[0]=>server_id)", host)
            KSR.set_advertised_address(D("SBC_FQDN"))
            KSR.set_advertised_port(D("MS_PORT"))
        if KSR.tm.t_relay() < 0 and not KSR.is_ACK():
            KSR.sl.sl_reply_error()

    def ksr_from_microsoft(self, msg: object) -> int:
        status = KSR.pv.geti("$rs")
        if (
            (180 <= status < 190 or 200 <= status < 300)
            and KSR.pv.gete("$rm") == "INVITE"
            and KSR.textops.has_body_type("application/sdp") > 0
        ):
            # Microsoft's private media-level c= line never reaches CUCM (seed 000).
            KSR.pv.sets("$var(native_sdp)", KSR.pv.gete("$rb").replace(D("MS_PRIVATE_C"), ""))
            if KSR.rtpengine.rtpengine_answer(D("ANSWER_TO_CUCM")) < 0:
                KSR.err(f"floor: rtpengine_answer failed, Call-ID {KSR.pv.gete('$ci')}\n")
        return 1

    def ksr_microsoft_failed(self, msg: object) -> int:
        KSR.rtpengine.rtpengine_delete0()
        return 1

    def ksr_tm_event(self, msg: object, evname: str) -> int:
        # The dispatcher's OPTIONS pings: the proxy's FQDN as SNI, the SBC's FQDN as Contact.
        if evname == "tm:local-request" and KSR.pv.gete("$rm") == "OPTIONS":
            host = KSR.pv.gete("$rd")
            KSR.pv.sets("$xavp(tls=>server_name)", host)
            KSR.pv.sets("$xavp(tls[0]=>server_id)", host)
            KSR.hdr.append(f"Contact: <sip:{D('SBC_FQDN')}:{D('MS_PORT')};transport=tls>\r\n")
        return 1


def mod_init() -> Floor:
    return Floor()
