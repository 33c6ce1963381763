"""Property-based fuzzing of every HTTP operation that GET /openapi.json describes.

Schemathesis generates valid and invalid requests from the document and checks each response:
never a 500, always a status, content type and body that the document allows. GET /auth/messages
gets a real bearer token, so its 200 path is fuzzed too.
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import positive_data_acceptance

import chat
from conftest import unique_name

EXAMPLES_PER_OPERATION = 50
CONFIG = SchemathesisConfig.from_dict({"generation": {"max-examples": EXAMPLES_PER_OPERATION}})


def load_schema():
    """(schema, None), or (None, the error) when GET /openapi.json is not a loadable document.
    Loading runs the app's lifespan on schemathesis's event loop; it is ended again at once so
    that the other test modules, collected later, start the app on their own loops."""
    try:
        return schemathesis.openapi.from_asgi("/openapi.json", chat.app, config=CONFIG), None
    except Exception as error:  # reported by a test below, not as a collection error for the whole run
        return None, error
    finally:
        asgi.shutdown_lifespans()


schema, LOAD_ERROR = load_schema()


@pytest.fixture(scope="module", autouse=True)
def end_the_apps_lifespan_afterwards():
    yield
    asgi.shutdown_lifespans()


def test_the_openapi_document_loads():
    assert LOAD_ERROR is None, f"GET /openapi.json is not an OpenAPI document schemathesis can load: {LOAD_ERROR!r}"


if schema is not None:

    @schema.auth()
    class BearerToken:
        """A valid access token for GET /auth/messages. Signed here rather than fetched through the
        app: schemathesis asks for it while collecting, and a request then would start the app on
        schemathesis's event loop for the rest of the run."""

        def get(self, case, context):
            return chat.make_token(unique_name("fuzz"), "access", 3600)

        def set(self, case, token, context):
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {token}"}

    @schema.parametrize()
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck))
    def test_no_request_gets_a_500_or_a_response_outside_the_schema(case):
        # The request schemas say "string" without the username and password rules (a 72-byte limit
        # cannot be written in JSON Schema), so a schema-valid body may rightly get 400: skip that check.
        case.call_and_validate(excluded_checks=[positive_data_acceptance])
