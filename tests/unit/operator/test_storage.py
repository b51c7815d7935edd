"""The storage seam: KubeStorage's requests and how it maps the API's answers; the fake keeps the same rules."""

from __future__ import annotations

from typing import Any, cast

import pytest

from kvpn_core.api import Kind
from kvpn_core.kube import ConflictError, InvalidError, Kube, KubeError, NotFoundError
from kvpn_operator.storage import KubeStorage, Storage
from tests.unit.fakes import FakeStorage

Obj = dict[str, Any]


class ScriptedKube:
    """Records each request and answers with the next scripted result: an object, a list, or an error."""

    def __init__(self, *answers: object) -> None:
        self.answers = list(answers)
        self.requests: list[tuple[str, str, object]] = []

    def _answer(self, verb: str, path: str, body: object = None) -> Any:
        self.requests.append((verb, path, body))
        answer = self.answers.pop(0) if self.answers else {}
        if isinstance(answer, Exception):
            raise answer
        return answer

    def get(self, path: str) -> Obj | None:
        return cast("Obj | None", self._answer("get", path))

    def list(self, path: str, *, label_selector: str | None = None, cached: bool = False) -> list[Obj]:
        return cast("list[Obj]", self._answer("list", path, (label_selector, cached)))

    def create(self, path: str, body: Obj) -> Obj:
        return cast("Obj", self._answer("create", path, body))

    def merge_patch(self, path: str, patch: Obj) -> Obj:
        return cast("Obj", self._answer("patch", path, patch))

    def delete(self, path: str, *, uid: str | None = None) -> bool:
        return cast("bool", self._answer("delete", path, uid))


def over(kube: ScriptedKube) -> KubeStorage:
    return KubeStorage(cast(Kube, kube))


def test_create_secret_in_the_namespace_and_a_taken_name_is_none() -> None:
    kube = ScriptedKube({"metadata": {"name": "s"}}, ConflictError(409, "exists"))
    storage = over(kube)
    assert storage.create_secret("vpn", {"metadata": {"name": "s"}}) == {"metadata": {"name": "s"}}
    assert storage.create_secret("vpn", {"metadata": {"name": "s"}}) is None
    assert [p for _, p, _ in kube.requests] == ["/api/v1/namespaces/vpn/secrets"] * 2


def test_status_patch_carries_the_resource_version_and_a_conflict_is_false() -> None:
    kube = ScriptedKube({}, ConflictError(409, "modified"))
    storage = over(kube)
    assert storage.patch_status(Kind.VPN_PEER, "vpn", "laptop", {"address": "10.8.0.2"}, resource_version="7")
    assert not storage.patch_status(Kind.VPN_PEER, "vpn", "laptop", {}, resource_version="7")
    verb, path, body = kube.requests[0]
    assert (verb, path) == ("patch", "/apis/kvpn.dev/v1alpha1/namespaces/vpn/vpnpeers/laptop/status")
    assert body == {"metadata": {"resourceVersion": "7"}, "status": {"address": "10.8.0.2"}}


def test_annotating_a_deleted_object_is_false() -> None:
    storage = over(ScriptedKube(NotFoundError(404, "gone")))
    assert not storage.annotate(Kind.VPN_PEER, "vpn", "laptop", {"k": "v"})


def test_other_errors_stay_errors_for_the_handlers_to_retry() -> None:
    storage = over(ScriptedKube(KubeError(0, "API server unreachable")))
    with pytest.raises(KubeError, match="unreachable"):
        storage.create_secret("vpn", {"metadata": {"name": "s"}})


def test_service_cidrs_none_when_not_served() -> None:
    kube = ScriptedKube(NotFoundError(404, "no such resource"), [{"spec": {"cidrs": ["10.96.0.0/12"]}}])
    storage = over(kube)
    assert storage.list_service_cidrs("v1") is None
    assert storage.list_service_cidrs("v1beta1") == [{"spec": {"cidrs": ["10.96.0.0/12"]}}]
    assert kube.requests[1][1] == "/apis/networking.k8s.io/v1beta1/servicecidrs"


def test_service_refusal_is_the_message_and_an_accepted_probe_is_deleted() -> None:
    probe = {"metadata": {"name": "probe"}}
    assert over(ScriptedKube(InvalidError(422, "range is 10.96.0.0/12"))).refusal_of_service("vpn", probe) == (
        "range is 10.96.0.0/12"
    )
    kube = ScriptedKube({}, True)
    assert over(kube).refusal_of_service("vpn", probe) is None
    assert kube.requests[1][:2] == ("delete", "/api/v1/namespaces/vpn/services/probe")


# --- the fake keeps the API's rules, or tests against it prove nothing -------------------------------


def test_fake_is_a_storage() -> None:
    storage: Storage = FakeStorage()
    assert storage.get(Kind.VPN_SERVER, "vpn", "office") is None


def test_fake_refuses_a_second_create_of_a_name() -> None:
    storage = FakeStorage()
    assert storage.create_secret("vpn", {"metadata": {"name": "s"}}) is not None
    assert storage.create_secret("vpn", {"metadata": {"name": "s"}}) is None


def test_fake_refuses_a_status_patch_at_a_stale_resource_version() -> None:
    storage = FakeStorage()
    obj = storage.put("vpnpeers", {"metadata": {"name": "laptop", "namespace": "vpn"}})
    rv = obj["metadata"]["resourceVersion"]
    assert storage.patch_status(Kind.VPN_PEER, "vpn", "laptop", {"address": "a"}, resource_version=rv)
    assert not storage.patch_status(Kind.VPN_PEER, "vpn", "laptop", {"address": "b"}, resource_version=rv)
    current = storage.get(Kind.VPN_PEER, "vpn", "laptop")
    assert current is not None
    assert current["status"] == {"address": "a"}
    with pytest.raises(NotFoundError):
        storage.patch_status(Kind.VPN_PEER, "vpn", "gone", {}, resource_version="1")


def test_fake_bumps_generation_on_spec_changes_only() -> None:
    storage = FakeStorage()
    storage.put("vpnservers", {"metadata": {"name": "office", "namespace": "vpn"}, "spec": {"mtu": 1420}})
    storage.annotate(Kind.VPN_SERVER, "vpn", "office", {"k": "v"})
    assert storage.edit("vpnservers", "vpn", "office", {"spec": {"mtu": 1380}})["metadata"]["generation"] == 2


def test_fake_delete_with_a_uid_spares_a_newer_object() -> None:
    storage = FakeStorage()
    old = storage.create_secret("vpn", {"metadata": {"name": "s"}})
    assert old is not None
    assert storage.delete_secret("vpn", "s", uid=old["metadata"]["uid"])
    assert storage.create_secret("vpn", {"metadata": {"name": "s"}}) is not None
    assert not storage.delete_secret("vpn", "s", uid=old["metadata"]["uid"])
    assert storage.get_secret("vpn", "s") is not None


def test_fake_merge_patch_deletes_keys_set_to_none() -> None:
    storage = FakeStorage()
    storage.create_secret("vpn", {"metadata": {"name": "s"}, "data": {"a": "1", "b": "2"}})
    storage.patch_secret_data("vpn", "s", {"a": None, "c": "3"})
    secret = storage.get_secret("vpn", "s")
    assert secret is not None
    assert secret["data"] == {"b": "2", "c": "3"}


def test_fake_lists_secrets_by_label() -> None:
    storage = FakeStorage()
    storage.create_secret("vpn", {"metadata": {"name": "a", "labels": {"x": "1", "y": "2"}}})
    storage.create_secret("vpn", {"metadata": {"name": "b", "labels": {"x": "1"}}})
    storage.create_secret("other", {"metadata": {"name": "c", "labels": {"x": "1", "y": "2"}}})
    assert [s["metadata"]["name"] for s in storage.list_secrets("vpn", label_selector="x=1,y=2")] == ["a"]
