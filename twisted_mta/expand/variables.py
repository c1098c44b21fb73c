"""Exim's expansion variables: which names exist and where values come from.

A value is looked up, in order, in the context's ``variables`` (set by the
session, the message or the ``-be`` command), then computed here from the
configuration or the clock.  A known name with no value is empty.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted_mta import EXIM_COMPAT_VERSION

if TYPE_CHECKING:
    from twisted_mta.expand.nodes import Evaluation

Getter = Callable[["Evaluation", str], str]

# Every variable Exim 4.96 knows (Debian's build: no ARC, and the filter-only
# $n0..$n9 are unknown here), plus the variables of the experimental features
# Debian's build lacks (BMI, DCC, DMARC) and their older names (proxy_host_*,
# tpda_*), which exim-py also accepts.
_KNOWN = """
acl_arg1 acl_arg2 acl_arg3 acl_arg4 acl_arg5 acl_arg6 acl_arg7 acl_arg8 acl_arg9 acl_narg
acl_verify_message address_data address_file address_pipe authenticated_fail_id authenticated_id authenticated_sender
authentication_failed av_failed bmi_alt_location bmi_base64_tracker_verdict
bmi_base64_verdict bmi_deliver body_linecount body_zerocount bounce_recipient
bounce_return_size_limit caller_gid caller_uid callout_address compile_date compile_number
config_dir config_file csa_status dcc_header dcc_result dkim_algo dkim_bodylength
dkim_canon_body dkim_canon_headers dkim_copiedheaders dkim_created dkim_cur_signer
dkim_domain dkim_expires dkim_headernames dkim_identity dkim_key_granularity
dkim_key_length dkim_key_nosubdomains dkim_key_notes dkim_key_srvtype dkim_key_testing
dkim_selector dkim_signers dkim_verify_reason dkim_verify_status dmarc_domain_policy
dmarc_status dmarc_status_text dmarc_used_domain dnslist_domain dnslist_matched
dnslist_text dnslist_value domain domain_data event_data event_defer_errno event_name
exim_gid exim_path exim_uid exim_version headers_added home host host_address host_data
host_lookup_deferred host_lookup_failed host_port initial_cwd inode interface_address
interface_port item ldap_dn load_average local_part local_part_data local_part_prefix
local_part_prefix_v local_part_suffix local_part_suffix_v local_scan_data local_user_gid
local_user_uid localhost_number log_inodes log_space lookup_dnssec_authenticated
mailstore_basename malware_name max_received_linelength message_age message_body
message_body_end message_body_size message_exim_id message_headers message_headers_raw
message_id message_linecount message_size message_smtputf8 mime_anomaly_level
mime_anomaly_text mime_boundary mime_charset mime_content_description
mime_content_disposition mime_content_id mime_content_size
mime_content_transfer_encoding mime_content_type mime_decoded_filename mime_filename
mime_is_coverletter mime_is_multipart mime_is_rfc822 mime_part_count original_domain original_local_part originator_gid originator_uid parent_domain
parent_local_part pid prdr_requested primary_hostname proxy_external_address
proxy_external_port proxy_local_address proxy_local_port proxy_session prvscheck_address
prvscheck_keynum prvscheck_result qualify_domain qualify_recipient queue_name queue_size
rcpt_count rcpt_defer_count rcpt_fail_count received_count received_for
received_ip_address received_port received_protocol received_time recipient_data
recipient_verify_failure recipients recipients_count regex_match_string reply_address
return_path return_size_limit router_name runrc self_hostname sender_address
sender_address_data sender_address_domain sender_address_local_part sender_data
sender_fullhost sender_helo_dnssec sender_helo_name sender_host_address
sender_host_authenticated sender_host_dnssec sender_host_name sender_host_port
sender_ident sender_rate sender_rate_limit sender_rate_period sender_rcvhost
sender_verify_failure sending_ip_address sending_port smtp_active_hostname smtp_command
smtp_command_argument smtp_command_history smtp_count_at_connection_start
smtp_notquit_reason spam_action spam_bar
spam_report spam_score spam_score_int spf_guess spf_header_comment spf_received
spf_result spf_result_guessed spf_smtp_comment spool_directory spool_inodes spool_space
srs_recipient thisaddress tls_bits tls_certificate_verified tls_cipher tls_in_bits
tls_in_certificate_verified tls_in_cipher tls_in_cipher_std tls_in_ocsp tls_in_ourcert
tls_in_peercert tls_in_peerdn tls_in_resumption tls_in_sni tls_in_ver tls_out_bits
tls_out_certificate_verified tls_out_cipher tls_out_cipher_std tls_out_dane tls_out_ocsp
tls_out_ourcert tls_out_peercert tls_out_peerdn tls_out_resumption tls_out_sni
tls_out_tlsa_usage tls_out_ver tls_peerdn tls_sni tod_bsdinbox tod_epoch tod_epoch_l
tod_full tod_log tod_logfile tod_zone tod_zulu transport_name value verify_mode
version_number warn_message_delay warn_message_recipient warn_message_recipients
warnmsg_delay warnmsg_recipient warnmsg_recipients
proxy_host_address proxy_host_port proxy_target_address proxy_target_port
proxy_tlv_authority proxy_tlv_unique_id proxy_tlv_ssl_version proxy_tlv_ssl_cn
proxy_tlv_ssl_cipher proxy_tlv_ssl_sig_alg proxy_tlv_ssl_key_alg proxy_tlv_ssl_verified
tpda_event_name tpda_event_data tpda_event_defer_errno tpda_event tpda_data tpda_defer_errno tpda_delivery_ip
tpda_delivery_port tpda_delivery_fqdn tpda_delivery_local_part tpda_delivery_domain
tpda_delivery_confirmation
""".split()


def _empty(ev: Evaluation, name: str) -> str:
    return ""


def _option(option: str, default: str = "") -> Getter:
    def get(ev: Evaluation, name: str) -> str:
        value = ev.ctx.main_option(option)
        return default if value is None else str(value)

    return get


def _primary_hostname(ev: Evaluation, name: str) -> str:
    value = ev.ctx.main_option("primary_hostname")
    return value if value else _hostname()


def _hostname() -> str:
    return os.uname().nodename


def _qualify_domain(ev: Evaluation, name: str) -> str:
    value = ev.ctx.main_option("qualify_domain")
    return value if value else _primary_hostname(ev, name)


def _qualify_recipient(ev: Evaluation, name: str) -> str:
    value = ev.ctx.main_option("qualify_recipient")
    return value if value else _qualify_domain(ev, name)


def _version(ev: Evaluation, name: str) -> str:
    return EXIM_COMPAT_VERSION


def _free_space(ev: Evaluation, which: str, inodes: bool) -> str:
    """Free kilobytes (or inodes) where the spool or the log lives, as
    Exim's $spool_space and friends report them."""
    path = str(ev.ctx.main_option("spool_directory", "") or "/")
    if which == "log":
        log_path = str(ev.ctx.main_option("log_file_path", "") or "")
        first = log_path.split(":")[0].strip()
        if first.startswith("/"):
            path = os.path.dirname(first)
    try:
        st = os.statvfs(path)
    except OSError:
        return "-1"
    if inodes:
        return str(st.f_favail)
    return str(st.f_bavail * st.f_frsize // 1024)


def _exim_path() -> str:
    """This program's own command, which configurations use to call it back."""
    import shutil
    import sys

    beside = os.path.join(os.path.dirname(sys.executable), "exim-py")
    if os.path.exists(beside):
        return beside
    return shutil.which("exim-py") or "exim-py"


def _constant(value: str) -> Getter:
    return lambda ev, name: value


def _now(ev: Evaluation) -> float:
    reactor = ev.ctx.reactor
    return reactor.seconds() if reactor is not None else time.time()


def _tod(fmt: str, utc: bool = False) -> Getter:
    def get(ev: Evaluation, name: str) -> str:
        stamp = _now(ev)
        tm = time.gmtime(stamp) if utc else time.localtime(stamp)
        return time.strftime(fmt, tm)

    return get


def _tod_epoch(ev: Evaluation, name: str) -> str:
    return str(int(_now(ev)))


def _tod_epoch_l(ev: Evaluation, name: str) -> str:
    return str(int(_now(ev) * 1_000_000))


def _tod_full(ev: Evaluation, name: str) -> str:
    tm = time.localtime(_now(ev))
    return time.strftime("%a, %d %b %Y %H:%M:%S ", tm) + _zone(tm)


def _tod_log(ev: Evaluation, name: str) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(_now(ev)))


def _tod_zone(ev: Evaluation, name: str) -> str:
    return _zone(time.localtime(_now(ev)))


def _zone(tm: time.struct_time) -> str:
    offset = tm.tm_gmtoff // 60
    sign = "+" if offset >= 0 else "-"
    offset = abs(offset)
    return f"{sign}{offset // 60:02d}{offset % 60:02d}"


def _tod_bsdinbox(ev: Evaluation, name: str) -> str:
    return time.strftime("%a %b %d %H:%M:%S %Y", time.localtime(_now(ev)))


def _uid(ev: Evaluation, name: str) -> str:
    return str(os.getuid())


def _gid(ev: Evaluation, name: str) -> str:
    return str(os.getgid())


def _pid(ev: Evaluation, name: str) -> str:
    return str(os.getpid())


def _value(ev: Evaluation, name: str) -> str:
    return ev.value or ""


def _item(ev: Evaluation, name: str) -> str:
    return ev.item or ""


def _runrc(ev: Evaluation, name: str) -> str:
    return str(ev.runrc)


def _acl_narg(ev: Evaluation, name: str) -> str:
    return str(len(ev.acl_args or ()))


def _acl_arg(ev: Evaluation, name: str) -> str:
    index = int(name[7:]) - 1
    args = ev.acl_args or ()
    return args[index] if index < len(args) else ""


def _config_file(ev: Evaluation, name: str) -> str:
    config = ev.ctx.config
    return getattr(config, "filename", "") or ""


def _config_dir(ev: Evaluation, name: str) -> str:
    # Exim's rule, quirks included: the file name up to its last "/", made
    # absolute by prefixing the working directory and a "/".
    filename = _config_file(ev, name)
    directory = filename[: max(filename.rfind("/"), 0)]
    if filename.startswith("/"):
        return directory
    return os.getcwd() + "/" + directory


def _spool_directory(ev: Evaluation, name: str) -> str:
    return str(ev.ctx.main_option("spool_directory", "") or "")


def _smtp_active_hostname(ev: Evaluation, name: str) -> str:
    return _primary_hostname(ev, name)


_SPECIAL: dict[str, Getter] = {
    "primary_hostname": _primary_hostname,
    "qualify_domain": _qualify_domain,
    "qualify_recipient": _qualify_recipient,
    "version_number": _version,
    "exim_version": _version,
    "compile_number": _constant("1"),
    "compile_date": _constant("01-Dec-2026 00:00:00"),
    "exim_path": lambda ev, name: _exim_path(),
    "tod_log": _tod_log,
    "tod_logfile": _tod("%Y%m%d"),
    "tod_full": _tod_full,
    "tod_bsdinbox": _tod_bsdinbox,
    "tod_epoch": _tod_epoch,
    "tod_epoch_l": _tod_epoch_l,
    "tod_zone": _tod_zone,
    "tod_zulu": _tod("%Y%m%d%H%M%SZ", utc=True),
    "caller_uid": _uid,
    "caller_gid": _gid,
    "exim_uid": _uid,
    "exim_gid": _gid,
    "originator_uid": _uid,
    "originator_gid": _gid,
    "pid": _pid,
    "value": _value,
    "item": _item,
    "runrc": _runrc,
    "acl_narg": _acl_narg,
    "config_file": _config_file,
    "config_dir": _config_dir,
    "spool_directory": _spool_directory,
    "smtp_active_hostname": _smtp_active_hostname,
    "message_size": _constant("0"),
    "load_average": lambda ev, name: str(int(os.getloadavg()[0] * 1000)),
    "spool_space": lambda ev, name: _free_space(ev, "spool", inodes=False),
    "spool_inodes": lambda ev, name: _free_space(ev, "spool", inodes=True),
    "log_space": lambda ev, name: _free_space(ev, "log", inodes=False),
    "log_inodes": lambda ev, name: _free_space(ev, "log", inodes=True),
    "spf_guess": _option("spf_guess", "v=spf1 a/24 mx/24 ptr ?all"),
    "local_user_uid": _constant("4294967295"),
    "local_user_gid": _constant("4294967295"),
    "max_received_linelength": _constant("0"),
    "received_port": _constant("-1"),
    "interface_port": _constant("-1"),
    "mime_part_count": _constant("-1"),
    "received_time": _constant("0"),
    "sender_host_port": _constant("0"),
    "bounce_return_size_limit": _option("bounce_return_size_limit", "102400"),
    "return_size_limit": _option("bounce_return_size_limit", "102400"),
    "bmi_deliver": _constant("1"),
    "recipients_count": _constant("0"),
    "rcpt_count": _constant("0"),
    "received_count": _constant("0"),
    "message_body_size": _constant("0"),
    "message_linecount": _constant("0"),
    "body_linecount": _constant("0"),
    "body_zerocount": _constant("0"),
    "localhost_number": _empty,
    "initial_cwd": lambda ev, name: os.getcwd(),
}
for _i in range(1, 10):
    _SPECIAL[f"acl_arg{_i}"] = _acl_arg
# The values Exim gives these before anything sets them.
for _name in (
    "authentication_failed av_failed event_defer_errno host_lookup_deferred "
    "host_lookup_failed host_port inode localhost_number message_age "
    "mime_anomaly_level mime_content_size mime_is_coverletter mime_is_multipart "
    "mime_is_rfc822 proxy_external_port proxy_local_port rcpt_defer_count "
    "rcpt_fail_count smtp_count_at_connection_start tls_bits tls_certificate_verified "
    "tls_in_bits tls_in_certificate_verified tls_in_ocsp tls_in_resumption tls_out_bits "
    "tls_out_certificate_verified tls_out_ocsp tls_out_resumption tls_out_tlsa_usage "
    "dkim_created dkim_key_length dkim_key_nosubdomains dkim_key_testing"
).split():
    _SPECIAL[_name] = _constant("0")
for _name in (
    "message_smtputf8 prdr_requested proxy_session sender_helo_dnssec "
    "sender_host_dnssec spf_result_guessed tls_out_dane"
).split():
    _SPECIAL[_name] = _constant("no")
_SPECIAL["sending_port"] = _constant("-1")
_SPECIAL["dkim_bodylength"] = _SPECIAL["dkim_expires"] = _constant("9999999999999")
_SPECIAL["dkim_key_granularity"] = _SPECIAL["dkim_key_srvtype"] = _constant("*")

_TABLE: dict[str, Getter] = {name: _SPECIAL.get(name, _empty) for name in _KNOWN}
_TABLE.update(_SPECIAL)


def variable_getter(name: str) -> Getter | None:
    """The getter for variable *name*, or None if Exim has no such variable."""
    getter = _TABLE.get(name)
    if getter is not None:
        return getter
    if name.startswith(("acl_c", "acl_m")) and (len(name) == 5 or not name[5].isalpha()):
        return _empty
    if name.startswith("r_"):
        return _empty
    if name.startswith("auth") and name[4:].isdigit() and 1 <= int(name[4:]) <= 4:
        return _empty
    if name.startswith("regex") and name[5:].isdigit() and 1 <= int(name[5:]) <= 9:
        return _empty
    return None


def unknown_variable_hint(name: str) -> str:
    """The explanation Exim appends when an unknown name looks like an
    attempt at an ACL variable."""
    if not name.startswith("acl_"):
        return ""
    if name.startswith(("acl_c", "acl_m")):
        return " (6th character of a user-defined ACL variable must be a digit or underscore)"
    return " (user-defined ACL variables must start acl_c or acl_m)"
