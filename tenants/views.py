from drf_spectacular.utils import extend_schema
from rest_framework.decorators import api_view
from rest_framework.request import Request
from rest_framework.response import Response

from tenants.authentication import request_tenant
from tenants.serializers import TenantOutputSerializer


@extend_schema(responses=TenantOutputSerializer, summary="The calling tenant and its limits")
@api_view(["GET"])
def tenant_detail(request: Request) -> Response:
    serializer = TenantOutputSerializer(request_tenant(request), context={"api_key": request.auth})
    return Response(serializer.data)
