/*
 * fused_projection_probe.c -- a design probe, not part of the engine: would
 * running the input projection inside the batch-1 recurrent steps (its FMAs
 * are idle there: a one-row step is bound by reading W_hh) beat hoisting it
 * into one GEMM before the steps?  Plain AVX-512 loops on synthetic weights,
 * T = 100, one thread, no gate math; medians of 15 runs of 20 sequences:
 *
 *   GEMV steps only          the steps with no projection (input size 1)
 *   standalone GEMM + steps  the engine's way: 6-row GEMM tiles over all T
 *                            rows first, then the steps
 *   fused tiles              each step, one block in RG (5) also computes an
 *                            RG-row GEMM tile of the next RG steps' G rows,
 *                            one W_ih row after every H/In W_hh rows (30 zmm
 *                            registers); each W_ih panel is then read once
 *                            per RG steps instead of once per call
 *
 *   gcc -O3 -mavx512f -mfma benchmarks/c/fused_projection_probe.c -o /tmp/fpp
 *   /tmp/fpp 256 128; /tmp/fpp 512 256          # hidden, input
 *
 * Measured 2026-12-04 on Zen 4 (README "Speed"): hidden 256, input 128: 10.8,
 * 13.2-13.3 and 12.6 us a step; hidden 512, input 256: 43.3, 53.0-53.2 and
 * 49.5-49.6.  The fused tiles win back only a quarter to a third of the
 * projection: the W_ih rereads cost bandwidth that the steps are bound by
 * (RG = 3: no gain; 4: ~2%; 5-6: ~5% and ~7%).  Two variants tried in a
 * copy of this file did no better: 10-row tiles of half a block (32 columns,
 * half the rereads): 12.7-12.8 and 50.0-50.6 us; every block every step doing a
 * fifth of a 5-row tile's K (partial sums through G, which keeps the bits):
 * 13.8-14.1 and 54.1-54.2 us, worse than hoisting.  Not worth the engine's complexity
 * yet, hence not in it.
 */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#define PW 64
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec*1e9+t.tv_nsec;}
static float *al(size_t n){float *p=aligned_alloc(64,n*4+64); for(size_t i=0;i<n;i++)p[i]=0.001f*(i%97); return p;}
/* GEMV block: acc = G; acc += h[k]*W[k]; store out */
__attribute__((noinline)) static void gemv(int K,const float*h,const float*W,const float*G,float*out){
  __m512 a0=_mm512_load_ps(G),a1=_mm512_load_ps(G+16),a2=_mm512_load_ps(G+32),a3=_mm512_load_ps(G+48);
  for(int k=0;k<K;k++){const float*w=W+(size_t)k*PW;__m512 b=_mm512_set1_ps(h[k]);
    a0=_mm512_fmadd_ps(b,_mm512_load_ps(w),a0);a1=_mm512_fmadd_ps(b,_mm512_load_ps(w+16),a1);
    a2=_mm512_fmadd_ps(b,_mm512_load_ps(w+32),a2);a3=_mm512_fmadd_ps(b,_mm512_load_ps(w+48),a3);}
  _mm512_store_ps(out,a0);_mm512_store_ps(out+16,a1);_mm512_store_ps(out+32,a2);_mm512_store_ps(out+48,a3);}
/* fused: GEMV K rows + GEMM 5 rows over Kx rows of Wx (every K/Kx GEMV rows one GEMM row) */
#define RG 5 /* rows of a fused GEMM tile */
__attribute__((noinline)) static void fused(int K,const float*h,const float*W,const float*G,float*out,
   int Kx,const float*X,int ldx,const float*Wx,const float*bias,float*Go,int ldg){
  __m512 a0=_mm512_load_ps(G),a1=_mm512_load_ps(G+16),a2=_mm512_load_ps(G+32),a3=_mm512_load_ps(G+48);
  __m512 g[RG][4];
  for(int r=0;r<RG;r++)for(int q=0;q<4;q++)g[r][q]=_mm512_load_ps(bias+16*q);
  int step=K/Kx;
  for(int kx=0;kx<Kx;kx++){
    for(int kk=0;kk<step;kk++){int k=kx*step+kk;const float*w=W+(size_t)k*PW;__m512 b=_mm512_set1_ps(h[k]);
    a0=_mm512_fmadd_ps(b,_mm512_load_ps(w),a0);a1=_mm512_fmadd_ps(b,_mm512_load_ps(w+16),a1);
    a2=_mm512_fmadd_ps(b,_mm512_load_ps(w+32),a2);a3=_mm512_fmadd_ps(b,_mm512_load_ps(w+48),a3);}
    {const float*v=Wx+(size_t)kx*PW;
      __m512 v0=_mm512_load_ps(v),v1=_mm512_load_ps(v+16),v2=_mm512_load_ps(v+32),v3=_mm512_load_ps(v+48);
      _Pragma("GCC unroll 5") for(int r=0;r<RG;r++){__m512 xb=_mm512_set1_ps(X[r*ldx+kx]);
        g[r][0]=_mm512_fmadd_ps(xb,v0,g[r][0]);g[r][1]=_mm512_fmadd_ps(xb,v1,g[r][1]);
        g[r][2]=_mm512_fmadd_ps(xb,v2,g[r][2]);g[r][3]=_mm512_fmadd_ps(xb,v3,g[r][3]);}}
  }
  _mm512_store_ps(out,a0);_mm512_store_ps(out+16,a1);_mm512_store_ps(out+32,a2);_mm512_store_ps(out+48,a3);
  for(int r=0;r<RG;r++)for(int q=0;q<4;q++)_mm512_store_ps(Go+r*ldg+16*q,g[r][q]);}
/* standalone gemm tile 6 rows x 64 over Kx */
__attribute__((noinline)) static void gemm6(int Kx,const float*X,int ldx,const float*Wx,const float*bias,float*Go,int ldg,int R){
  __m512 g[6][4];
  for(int r=0;r<6;r++)for(int q=0;q<4;q++)g[r][q]=_mm512_load_ps(bias+16*q);
  for(int k=0;k<Kx;k++){const float*v=Wx+(size_t)k*PW;
    __m512 v0=_mm512_load_ps(v),v1=_mm512_load_ps(v+16),v2=_mm512_load_ps(v+32),v3=_mm512_load_ps(v+48);
    for(int r=0;r<6;r++){__m512 xb=_mm512_set1_ps(X[r*ldx+k]);
      g[r][0]=_mm512_fmadd_ps(xb,v0,g[r][0]);g[r][1]=_mm512_fmadd_ps(xb,v1,g[r][1]);
      g[r][2]=_mm512_fmadd_ps(xb,v2,g[r][2]);g[r][3]=_mm512_fmadd_ps(xb,v3,g[r][3]);}}
  for(int r=0;r<R;r++)for(int q=0;q<4;q++)_mm512_store_ps(Go+r*ldg+16*q,g[r][q]);}
int cmp(const void*a,const void*b){double x=*(double*)a,y=*(double*)b;return x<y?-1:x>y;}
int main(int argc,char**argv){
  int H=argc>1?atoi(argv[1]):256, In=argc>2?atoi(argv[2]):128, T=100; int nb=H/16;
  float*W=al((size_t)nb*H*PW),*Wx=al((size_t)nb*In*PW),*bias=al((size_t)nb*PW),*h=al(H),*X=al((size_t)(T+10)*In);
  float*G=al((size_t)(T+10)*nb*PW),*out=al((size_t)nb*PW);
  int ldg=nb*PW;
  double r[3][15];
  for(int rep=0;rep<15;rep++){
   for(int v=0;v<3;v++){
    double t0=now();
    for(int it=0;it<20;it++){
     if(v==1){ /* standalone GEMM for all T rows, then GEMV steps */
       for(int j=0;j<nb;j++) for(int m=0;m<T;m+=6) gemm6(In,X+(size_t)m*In,In,Wx+(size_t)j*In*PW,bias+j*PW,G+(size_t)m*ldg+j*PW,ldg,T-m<6?T-m:6);
     }
     for(int s=0;s<T;s++){
      for(int j=0;j<nb;j++){
        const float*Gs=G+(size_t)s*ldg+j*PW;
        if(v==2 && (j%RG)==(s%RG)){ int q=s/RG+1; /* tile q: steps 5q..5q+4 */
          fused(H,h,W+(size_t)j*H*PW,Gs,out+j*PW,In,X+(size_t)(q*RG)*In,In,Wx+(size_t)j*In*PW,bias+j*PW,G+(size_t)(q*RG)*ldg+j*PW,ldg);
        } else gemv(H,h,W+(size_t)j*H*PW,Gs,out+j*PW);
      }
     }
    }
    r[v][rep]=(now()-t0)/20/T/1000;
   }
  }
  const char*nm[3]={"GEMV steps only (In=1)","standalone GEMM + steps","fused tiles"};
  for(int v=0;v<3;v++){qsort(r[v],15,sizeof(double),cmp);printf("H %d In %d %-26s %.2f us/step\n",H,In,nm[v],r[v][7]);}
}
