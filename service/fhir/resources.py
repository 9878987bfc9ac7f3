"""The ledger's records as HL7 FHIR R4 resources (contracts/FHIR-MAPPING.md).

Every resource is built as plain data and validated by the ``fhir.resources``
R4B models (R4B's Consent, AuditEvent, Bundle, CapabilityStatement and
OperationOutcome are R4's) before it leaves, so a mapping mistake fails
here rather than in a client's parser.
"""

from __future__ import annotations

from typing import Any

from fhir.resources.R4B.auditevent import AuditEvent
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.consent import Consent
from fhir.resources.R4B.operationoutcome import OperationOutcome

from contracts.bodies import Choices, HistoryItem, HistoryPage
from contracts.codes import FINER_SCOPES

MEDIA_TYPE = "application/fhir+json"
FHIR_VERSION = "4.0.1"
NHS_NUMBER = "https://fhir.nhs.uk/Id/nhs-number"
ODS_CODE = "https://fhir.nhs.uk/Id/ods-organization-code"
POSITION = "urn:consent-ledger:position"
LEAF_HASH = "urn:consent-ledger:leaf-hash"
GRANT = "urn:consent-ledger:grant:"
NATIONAL_OPT_OUT_POLICY = "https://digital.nhs.uk/services/national-data-opt-out"
TYPE_1_OPT_OUT_POLICY = "https://digital.nhs.uk/services/national-data-opt-out/type-1-opt-outs"
_ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
_ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
_DCM = "http://dicom.nema.org/resources/ontology/DCM"
_LIFECYCLE = "http://terminology.hl7.org/CodeSystem/iso-21089-lifecycle"
_EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
_INTERACTION = "http://hl7.org/fhir/restful-interaction"
_ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
_OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
_PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
_BALP = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/"

# Our purposes as HL7 v3 ActReason purposes of use (the closest each has).
PURPOSE_OF_USE: dict[str, tuple[str, str]] = {
    "research": ("HRESCH", "healthcare research"),
    "planning": ("HOPERAT", "healthcare operations"),
    "commissioning": ("HOPERAT", "healthcare operations"),
    "public-health": ("PUBHLTH", "public health"),
    "service-evaluation": ("HQUALIMP", "health quality improvement"),
    "clinical-audit": ("HQUALIMP", "health quality improvement"),
}
_SCOPE_POLICY = {"national": NATIONAL_OPT_OUT_POLICY, "type-1": TYPE_1_OPT_OUT_POLICY,
                 **{scope: f"urn:consent-ledger:choice:{scope}" for scope in FINER_SCOPES}}


def _coding(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    return {"system": system, "code": code, **({"display": display} if display else {})}


def _patient(nhs_number: str) -> dict[str, Any]:
    return {"identifier": {"system": NHS_NUMBER, "value": nhs_number}}


def _ledger_ids(position: int, leaf_hash: bytes | None) -> list[dict[str, Any]]:
    ids = [{"system": POSITION, "value": str(position)}]
    if leaf_hash is not None:
        ids.append({"system": LEAF_HASH, "value": leaf_hash.hex()})
    return ids


def _purposes() -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for code, display in PURPOSE_OF_USE.values():
        seen.setdefault(code, _coding(_ACT_REASON, code, display))
    return list(seen.values())


def _consent(kind: str, position: int, leaf_hash: bytes | None, nhs_number: str, when: str | None,
             scope: tuple[str, str], policy: str, rule: str, provision: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "Consent",
        "id": f"{kind}-{position}",
        "identifier": _ledger_ids(position, leaf_hash),
        "status": "active",
        "scope": {"coding": [_coding(_SCOPE, *scope)]},
        "category": [{"coding": [_coding("http://loinc.org", "59284-0", "Patient Consent")]}],
        "patient": _patient(nhs_number),
        "dateTime": when,
        "policy": [{"uri": policy}],
        "policyRule": {"coding": [_coding(_ACT_CODE, rule)]},
        "provision": provision,
    }


def consents(choices: Choices, leaf_hashes: dict[int, bytes]) -> list[dict[str, Any]]:
    """The patient's current choices: one Consent per recorded opt-out scope
    (deny while opted out, permit once opted back in) and one per study
    consent in force (permit, under the grant as its policy)."""
    out = []
    for scope, choice in sorted(choices.scopes.items()):
        if choice.state == "not-recorded" or choice.position is None:
            continue
        opted_out = choice.state == "opted-out"
        out.append(_consent("choice", choice.position, leaf_hashes.get(choice.position), choices.nhs_number,
                            choice.since, ("patient-privacy", "Privacy Consent"), _SCOPE_POLICY[scope],
                            "OPTOUT" if opted_out else "OPTIN",
                            {"type": "deny" if opted_out else "permit", "purpose": _purposes()}))
    for consent in choices.consents:
        out.append(_consent("consent", consent.position, leaf_hashes.get(consent.position), choices.nhs_number,
                            consent.given_at, ("research", "Research"), GRANT + consent.grant_id, "OPTIN",
                            {"type": "permit"}))
    for resource in out:
        Consent.model_validate(resource)
    return out


def _audit_event(nhs_number: str, item: HistoryItem) -> dict[str, Any]:
    patient_entity = {
        "what": _patient(nhs_number),
        "type": _coding(_ENTITY_TYPE, "1", "Person"),
        "role": _coding(_OBJECT_ROLE, "1", "Patient"),
    }
    ledger = {"system": "urn:consent-ledger", "value": "consent-ledger"}
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": f"entry-{item.position}",
        "recorded": item.recorded_at,
        "outcome": "0",
        "outcomeDesc": item.summary,
        "source": {"observer": {"identifier": ledger, "display": "consent-ledger"},
                   "type": [_coding("http://terminology.hl7.org/CodeSystem/security-source-type", "4",
                                    "Application Server")]},
        "entity": [patient_entity,
                   {"what": {"identifier": {"system": POSITION, "value": str(item.position)}},
                    "type": _coding(_ENTITY_TYPE, "2", "System Object"), "description": item.event_type}],
    }
    if item.kind == "data-use":
        assert item.organisation is not None
        event["meta"] = {"profile": [_BALP + "IHE.BasicAudit.PrivacyDisclosure.Source"]}
        event["type"] = _coding(_DCM, "110106", "Export")
        event["subtype"] = [_coding(_LIFECYCLE, "disclose", "Disclose Record Lifecycle Event")]
        event["action"] = "R"
        if item.occurred_at:
            event["period"] = {"start": item.occurred_at}
        if item.purpose is not None and item.purpose.code in PURPOSE_OF_USE:
            code, display = PURPOSE_OF_USE[item.purpose.code]
            event["purposeOfEvent"] = [{"coding": [_coding(_ACT_REASON, code, display)],
                                        "text": item.purpose.label}]
        event["agent"] = [
            {"type": {"coding": [_coding(_DCM, "110150", "Application")]}, "who": {"identifier": ledger},
             "requestor": False},
            {"type": {"coding": [_coding(_DCM, "110152", "Destination Role ID")]},
             "who": {"identifier": {"system": ODS_CODE, "value": item.organisation.code},
                     "display": item.organisation.name},
             "requestor": True},
        ]
        details = [("grant", item.grant_id), ("legal-basis", item.legal_basis.code if item.legal_basis else None),
                   ("exemption", item.exemption.code if item.exemption else None),
                   ("opt-out", item.opt_out), ("access-method", item.access_method.code if item.access_method else None)]
        event["entity"].append({
            "what": {"identifier": {"system": GRANT.rstrip(":"), "value": item.grant_id or ""}},
            "type": _coding(_ENTITY_TYPE, "2", "System Object"),
            "name": ", ".join(item.datasets or []) or None,
            "description": item.purpose_description,
            "detail": [{"type": k, "valueString": v} for k, v in details if v],
        })
    elif item.kind == "access":
        event["meta"] = {"profile": [_BALP + "IHE.BasicAudit.PatientRead"]}
        event["type"] = _coding(_EVENT_TYPE, "rest", "Restful Operation")
        event["subtype"] = [_coding(_INTERACTION, "read", "read")]
        event["action"] = "R"
        reader = item.actor or "a reader"
        event["agent"] = [{"type": {"coding": [_coding(_PARTICIPATION, "IRCP", "information recipient")]},
                           "who": {"display": reader}, "requestor": True}]
    else:  # a choice or a consent changed
        event["type"] = _coding(_EVENT_TYPE, "rest", "Restful Operation")
        event["subtype"] = [_coding(_INTERACTION, "create", "create")]
        event["action"] = "C"
        who = item.actor or "patient"
        event["agent"] = [{"type": {"coding": [_coding(_PARTICIPATION, "AUT", "author")]},
                           "who": {"display": who}, "requestor": True}]
    for entity in event["entity"]:
        if entity.get("name") is None:
            entity.pop("name", None)
        if entity.get("description") is None:
            entity.pop("description", None)
    AuditEvent.model_validate(event)
    return event


def searchset(resources: list[dict[str, Any]], self_url: str, next_url: str | None = None) -> dict[str, Any]:
    links = [{"relation": "self", "url": self_url}]
    if next_url is not None:
        links.append({"relation": "next", "url": next_url})
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(resources) if next_url is None else None,
        "link": links,
        "entry": [{"fullUrl": f"urn:consent-ledger:{r['resourceType']}/{r['id']}", "resource": r,
                   "search": {"mode": "match"}} for r in resources],
    }
    if bundle["total"] is None:
        del bundle["total"]
    # Each resource was validated when it was built; validating them again
    # inside the Bundle would double the cost of a 200-event page.
    Bundle.model_validate({**bundle, "entry": [{**e, "resource": None} for e in bundle["entry"]]})
    return bundle


def audit_events(page: HistoryPage) -> list[dict[str, Any]]:
    return [_audit_event(page.nhs_number, item) for item in page.items]


def capability_statement(version: str, date: str) -> dict[str, Any]:
    patient_param = {"name": "patient", "type": "reference",
                     "documentation": "the patient's NHS number (an identifier or a bare 10 digits)"}
    statement = {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": date,
        "kind": "instance",
        "software": {"name": "consent-ledger", "version": version},
        "implementation": {"description": "consent-ledger: patients' data choices and every use of their data"},
        "fhirVersion": FHIR_VERSION,
        "format": [MEDIA_TYPE],
        "rest": [{
            "mode": "server",
            "security": {"description": "OAuth2 bearer tokens (role patient-app; a patient's own token may "
                                        "read only that patient); every read is recorded in the ledger"},
            "resource": [
                {"type": "Consent", "interaction": [{"code": "search-type"}], "searchParam": [patient_param]},
                {"type": "AuditEvent", "interaction": [{"code": "search-type"}],
                 "searchParam": [patient_param,
                                 {"name": "_count", "type": "number", "documentation": "page size, 1 to 1000"}]},
            ],
        }],
    }
    CapabilityStatement.model_validate(statement)
    return statement


# HTTP status -> OperationOutcome issue code (FHIR's issue-type value set).
_ISSUE_CODE = {400: "invalid", 401: "login", 403: "forbidden", 404: "not-found", 405: "not-supported",
               409: "conflict", 413: "too-costly", 415: "not-supported", 422: "business-rule", 503: "transient"}


def operation_outcome(status: int, detail: str, issues: list[tuple[str, str]]) -> dict[str, Any]:
    """One issue per (path, message), or one saying ``detail`` when there are none."""
    code = _ISSUE_CODE.get(status, "exception")
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": message, "expression": [path]}
                  for path, message in issues] or [{"severity": "error", "code": code, "diagnostics": detail}],
    }
    OperationOutcome.model_validate(outcome)
    return outcome


def import_response(receipts: list[Any]) -> dict[str, Any]:
    """A transaction-response Bundle: per imported Consent, 201 and the
    position of the entry written, or 200 where the ledger already held a
    choice for that patient and scope (or that consent)."""
    entries = []
    for receipt in receipts:
        if receipt is None:
            entries.append({"response": {"status": "200 OK"}})
        else:
            entries.append({"response": {"status": "201 Created",
                                         "location": f"{POSITION}/{receipt.position}",
                                         "lastModified": receipt.recorded_at}})
    bundle = {"resourceType": "Bundle", "type": "transaction-response", "entry": entries}
    Bundle.model_validate(bundle)
    return bundle
